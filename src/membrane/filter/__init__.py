"""`membrane filter`: the seed documents' packet filters (XDP and tc), pinned and live."""
