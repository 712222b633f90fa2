"""What runs the jobs on Prefect: the job base (:mod:`.jobbase`), prefect.yaml reading and
checks (:mod:`.prefect_yaml`), deploying it (:mod:`.deploy`) and triggering runs
(:mod:`.trigger`)."""
