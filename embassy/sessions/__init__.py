"""Sessions: the unit a workload is sealed for, journaled so a crash never unseals one."""
