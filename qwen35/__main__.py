import sys

from qwen35.cli import _entry

sys.exit(_entry())
