version = "0.0.17v1.8.0rc"
