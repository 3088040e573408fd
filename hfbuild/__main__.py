import sys

if sys.argv[1:2] == ["--witness"]:  # a build's side check (pipeline/witness.py), not a user's
    from hfbuild.cli.witness import main as side_check

    sys.exit(side_check(sys.argv[2:]))

from hfbuild.cli.main import main

sys.exit(main())
