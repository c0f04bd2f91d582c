import sys

from qwen35.cli import main

sys.exit(main())
