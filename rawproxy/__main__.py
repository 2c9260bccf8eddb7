import sys

from rawproxy.cli import main

sys.exit(main())
