import sys

from dkr.cli.launch import main

sys.exit(main())
