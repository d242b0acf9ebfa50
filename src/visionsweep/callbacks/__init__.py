"""Lightning callbacks of visionsweep, one file per callback (configured in ``conf/callbacks/``)."""
