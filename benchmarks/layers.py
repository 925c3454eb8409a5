"""Same as ``normlab bench layers``; arguments pass through."""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layers", *sys.argv[1:]]))
