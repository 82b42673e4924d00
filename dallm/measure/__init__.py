"""The measure wing: image features, KID and its statistics, readouts, the KID round and `dallm kid`."""
