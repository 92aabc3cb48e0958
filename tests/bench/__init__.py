"""The side-by-side benchmark against the Go reference chain (`make bench`, issue 9).

`run` is the harness, `driver` the timer it runs inside a lab node, `stats` the percentiles.
Nothing here is collected by pytest (no test_*.py): the bench is a measurement, not a test.
"""
