import sys

from stem_live.monitor import main

sys.exit(main())
