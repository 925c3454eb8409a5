"""Training-step slowdown of a diagnostics Probe. Same as ``normlab bench probe``."""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "probe", *sys.argv[1:]]))
