"""Studies: sweeps over config grids and reports over their run folders."""
