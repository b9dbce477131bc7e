//! Keeping the request path's stack frames small. A future's poll is compiled into the poll of
//! the future that awaits it, and a future is built where it is made: a cold path's large future
//! (opening a TLS connection, hyper's HTTP/2 connection, a Redis round trip) awaited in line
//! gives its caller's poll a frame with room for it, on every call, taken or not. The poll
//! functions of the request path call each other about ten deep, so such room adds up to a
//! deep stack that every request touches a little of (a line here and there, a page at a
//! time), and that at a low rate a request finds out of the caches.

use std::future::Future;
use std::pin::Pin;

/// A future made apart: `make` is called in a frame of its own, its future boxed and polled
/// through a pointer, so that neither the caller's future nor the caller's poll holds room for
/// it.
#[inline(never)]
pub fn boxed<'a, F>(
    make: impl FnOnce() -> F,
) -> Pin<Box<dyn Future<Output = F::Output> + Send + 'a>>
where
    F: Future + Send + 'a,
{
    Box::pin(make())
}
