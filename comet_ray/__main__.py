from comet_ray.cli import main

raise SystemExit(main())
