"""Scan engines: the built-in trio TCP connect scanner and nmap, run in a child process."""
