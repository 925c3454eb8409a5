"""Eval inference of a ResNet-18-style CNN, BatchNorm unfolded vs folded.

Same as ``normlab bench fold``; arguments pass through (``--quick``, ``--threads``, ``--out``).
"""

import sys

from normlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "fold", *sys.argv[1:]]))
