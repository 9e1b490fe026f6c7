import sys

from UniversalSegLib.cli import main

sys.exit(main())
