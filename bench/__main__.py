"""Run every benchmark and print its figures."""

from bench import latency, sweep, sync, web_load
from visitwatch.daemon import logs

logs.configure("warning")  # as the daemon runs; debug output would dominate the timings
sweep.main()
sync.main()
latency.main([])
web_load.main([])
