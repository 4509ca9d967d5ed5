"""Command lines of the package (`causalvdm-train`, `causalvdm-sample`); scripts/*.py and the .sh launchers call them."""
