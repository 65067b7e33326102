import sys

from splicectl.main import main

sys.exit(main())
