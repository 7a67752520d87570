"""Problems and where they come from: the `Problem` record, the seed streams and the chunk
schedule (`problems`), problem files (`files`), built-in task families and data regimes
(`tasks`), rewards (`rewards`)."""
