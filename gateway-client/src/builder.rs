//! Builder methods shared by [`GrpcBuilder`](crate::GrpcBuilder) and
//! [`RestBuilder`](crate::RestBuilder).

macro_rules! common_builder_methods {
    () => {
        /// The balancer (default [`Balance::P2c`](crate::Balance::P2c)).
        pub fn balance(mut self, balance: crate::Balance) -> Self {
            self.options.balance.balance = balance;
            self
        }

        /// Prefer instances whose `zone` metadata is `zone`; use the others only when none of
        /// them is available (empty, or all ejected).
        pub fn zone(mut self, zone: impl Into<String>) -> Self {
            self.options.balance.zone = Some(zone.into());
            self
        }

        /// Ramp a new instance's share of calls up linearly over `period` (p2c and weighted).
        pub fn warm_up(mut self, period: std::time::Duration) -> Self {
            self.options.balance.warm_up = period;
            self
        }

        /// A timeout per call (all attempts included), propagated downstream as the deadline.
        pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
            self.options.timeout = Some(timeout);
            self
        }

        /// Attempts per call, the first included (default 3; 1 disables retries).
        pub fn max_attempts(mut self, attempts: u32) -> Self {
            self.options.max_attempts = attempts.max(1);
            self
        }

        /// Backoff before the first retry, doubling up to `max` (full jitter; default 10 ms,
        /// 500 ms).
        pub fn backoff(mut self, base: std::time::Duration, max: std::time::Duration) -> Self {
            self.options.backoff = (base, max.max(base));
            self
        }

        /// The retry budget (default: 20 % of calls plus 10 retries per second, over 10 s);
        /// share one between clients to bound their retries together.
        pub fn retry_budget(
            mut self,
            budget: std::sync::Arc<keel_breaker::retry::RetryBudget>,
        ) -> Self {
            self.options.budget = budget;
            self
        }

        /// The per-endpoint circuit breaker (outlier ejection); default
        /// [`default_endpoint_breaker`](crate::default_endpoint_breaker).
        pub fn breaker(mut self, config: keel_breaker::breaker::BreakerConfig) -> Self {
            self.options.breaker = config;
            self
        }

        /// TLS for instances that serve it (an `https` URL, or a registry instance marked TLS,
        /// e.g. with a Spring `sslPort`).
        pub fn tls(mut self, tls: crate::TlsConfig) -> Self {
            self.options.tls = Some(tls);
            self
        }

        /// How long opening a connection may take (default 2 s).
        pub fn connect_timeout(mut self, timeout: std::time::Duration) -> Self {
            self.options.connect_timeout = timeout;
            self
        }

        /// Dead-peer detection at the TCP level, for a provider's host that vanishes without
        /// closing its connections (powered off, partitioned): each connection is probed after
        /// `idle` without traffic (TCP keep-alive, then every third of it) and is closed once
        /// data or probes stay unacknowledged for three times `idle` (`TCP_USER_TIMEOUT` on
        /// Linux), failing the calls on it. Default
        /// [`DEFAULT_TCP_KEEPALIVE`](crate::DEFAULT_TCP_KEEPALIVE) (30 s): such calls fail
        /// within about 100 s, where the system's defaults take about 15 minutes (and forever
        /// for a REST call without a deadline that waits for its response).
        ///
        /// A live provider's kernel answers the probes however long its handler takes. What
        /// the user timeout also ends (Linux 5.11 and later) is a connection whose peer keeps
        /// its receive window closed that long, e.g. a server that stops reading a request
        /// body for 90 s; a call on it fails with an unknown outcome.
        ///
        /// `None` (or zero) leaves the system's defaults. Outside
        /// [`TCP_KEEPALIVE_RANGE`](crate::TCP_KEEPALIVE_RANGE) (whole seconds, as the kernel
        /// counts them) the build fails with [`Error::is_config`](crate::Error::is_config).
        pub fn tcp_keepalive(mut self, idle: Option<std::time::Duration>) -> Self {
            self.options.tcp_keepalive = idle.filter(|idle| !idle.is_zero());
            self
        }

        /// A bulkhead for this downstream: at most `n` calls of this client (all its clones; a
        /// call holds its slot through all its attempts) in flight at once. A call finding
        /// every slot taken fails at once (see [`max_concurrent_wait`](Self::max_concurrent_wait))
        /// with an error for which [`Error::is_bulkhead_full`](crate::Error::is_bulkhead_full)
        /// holds: never sent, `RESOURCE_EXHAUSTED` / 503. Default: no limit.
        pub fn max_concurrent(mut self, n: usize) -> Self {
            let wait = self
                .options
                .bulkhead
                .map_or(std::time::Duration::ZERO, |b| b.1);
            self.options.bulkhead = Some((n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS), wait));
            self
        }

        /// How long a call may wait for a bulkhead slot before it is rejected (default zero:
        /// rejected at once). Only with [`max_concurrent`](Self::max_concurrent).
        ///
        /// The wait is spent in the client's `poll_ready` (tower's `ready()`, which tonic's
        /// generated clients and [`RestClient`](crate::RestClient)'s calls await before the
        /// call), before the call's own [`timeout`](Self::timeout) starts: a call may take up to
        /// this wait plus its timeout. A deadline the request carries in its extensions
        /// ([`Deadline`](keel_breaker::deadline::Deadline), e.g. a server's incoming one) is a
        /// point in time, and the wait counts against it.
        pub fn max_concurrent_wait(mut self, wait: std::time::Duration) -> Self {
            if let Some(bulkhead) = &mut self.options.bulkhead {
                bulkhead.1 = wait;
            }
            self
        }

        /// Make the client spans with this SDK provider's tracer (scope `keel-client`), held in
        /// each call's future. Default: OpenTelemetry's global provider, resolved when the
        /// client is built, whose spans its API boxes (an allocation per call). `keel::App`
        /// passes the provider it installed.
        pub fn tracer_provider(
            mut self,
            provider: &opentelemetry_sdk::trace::SdkTracerProvider,
        ) -> Self {
            use opentelemetry::trace::TracerProvider as _;
            self.options.tracer = Some(provider.tracer(crate::span::TRACER_NAME));
            self
        }

        /// A header sent with every request that has none of that name (e.g. an API key for a
        /// gateway); several calls with one name send all their values. An invalid name or
        /// value is reported by the build method ([`Error::is_config`](crate::Error::is_config)).
        pub fn default_header(mut self, name: &str, value: &str) -> Self {
            match crate::options::header_pair(name, value) {
                Ok((n, v)) => {
                    self.options.default_headers.append(n, v);
                }
                Err(_) => {
                    self.options
                        .invalid_header
                        .get_or_insert_with(|| name.to_owned());
                }
            }
            self
        }

        /// Whether to stamp an `x-request-id` on requests that have none (default true).
        pub fn request_id(mut self, yes: bool) -> Self {
            self.options.request_id = yes;
            self
        }
    };
}

pub(crate) use common_builder_methods;
