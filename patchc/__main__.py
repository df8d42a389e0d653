import sys

from patchc.cli import main

sys.exit(main())
