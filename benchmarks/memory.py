"""Same as ``normlab bench memory``; arguments pass through."""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "memory", *sys.argv[1:]]))
