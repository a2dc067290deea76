"""Model cards (JSON) of the built-in prognosis cohorts; rebuilt with tools.prognosis.rebuild_cards()."""
