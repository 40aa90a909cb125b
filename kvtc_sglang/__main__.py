import sys

from kvtc_sglang.cli import main

sys.exit(main())
