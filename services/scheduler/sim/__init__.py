"""The simulator (virtual time): a scenario (scenario.py) through the real autoscaler and
placement (simulator.py), and its report (report.py). Used by bench/simulate.py and the tests;
no service imports it."""
