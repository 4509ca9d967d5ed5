"""Command lines of the package (`causalvdm-train`, `causalvdm-sample`, and those of tools/ such as verify_cache);
scripts/*.py, the .sh launchers and tools/*.py call them."""
