"""Jobs: a SQLite store (store.py), the queue that runs them (queue.py), the lock a running
job holds on its folder (lock.py) and what a job folder needs to run again (resume.py)."""
