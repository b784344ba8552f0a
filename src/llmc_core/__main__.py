import sys

from llmc_core.cli import main

sys.exit(main())
