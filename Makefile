.PHONY: test run lint
test:  ## set up .venv and run every test
	./scripts/test
run:   ## set up .venv, migrate the embedded database, run cleanup-job
	./scripts/run
lint:  ## ruff and mypy (strict on src/)
	bash -c "source scripts/_venv.sh && .venv/bin/ruff check . && .venv/bin/mypy"
