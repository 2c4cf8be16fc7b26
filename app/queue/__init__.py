"""Queue logic: the job lifecycle, written once, independent of HTTP and of the database."""
