from trustrl.cli import main

raise SystemExit(main())
