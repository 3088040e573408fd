import sys

from hfbuild.cli import main

sys.exit(main())
