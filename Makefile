# Shortcuts for the two scripts a fresh machine needs; each does its own set-up.
.PHONY: quickstart test

quickstart:  ## set up, train the quick start (four epochs, about 5 minutes on a 2-core CPU), draw its figures
	scripts/quickstart.sh

test:  ## set up, run the tests and the conformance suite (what CI runs)
	scripts/test.sh
