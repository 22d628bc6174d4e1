"""`python -m fastlora ...` runs the `fastlora` command (fastlora.cli)."""
import sys

from fastlora.cli import main

if __name__ == "__main__":
    sys.exit(main())
