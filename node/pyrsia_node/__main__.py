from pyrsia_node.cli import main

raise SystemExit(main())
