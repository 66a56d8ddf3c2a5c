"""Engine: scheduler, paged KV, radix cache, model runner, sampler."""
