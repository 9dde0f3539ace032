import sys

from reidgen.cli import main

sys.exit(main())
