"""One pull or many: resolve, download into the spool, build layers, make the machine."""
