import sys

from hfbuild.cli.main import main

sys.exit(main())
