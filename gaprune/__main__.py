import sys

from gaprune.cli import main

sys.exit(main())
