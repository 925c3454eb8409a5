"""SyncBatchNorm vs local BatchNorm in a 2-process gloo DDP step. Same as ``normlab bench sync``."""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sync", *sys.argv[1:]]))
