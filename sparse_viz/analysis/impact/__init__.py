"""Impact: which keys matter to each query, and whether a selection of keys keeps them."""
