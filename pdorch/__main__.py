import sys

from pdorch.cli import main

sys.exit(main())
