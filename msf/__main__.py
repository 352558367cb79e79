import sys

from msf.train.cli import main

sys.exit(main())
