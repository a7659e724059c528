"""wallcrawler-controller: the daemon inside every Wallcrawler browser task."""
