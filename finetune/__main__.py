import sys

from finetune.cli.main import main

sys.exit(main())
