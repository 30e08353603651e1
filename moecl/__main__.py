import sys

from moecl.cli import main

sys.exit(main())
