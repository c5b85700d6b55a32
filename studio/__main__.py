from studio.app.cli import main

raise SystemExit(main())
