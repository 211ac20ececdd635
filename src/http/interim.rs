//! Interim (1xx) responses an upstream sends before its final one (`103 Early Hints`, a `100
//! Continue`), relayed to the client as they come: RFC 9110 §15.2 has a proxy forward every 1xx it
//! did not ask for itself. The upstream connection reports them to a callback on the request
//! (`hyper::ext::on_informational`), and the client's connection takes them through the
//! `InterimSender` hyper puts in each request (both from `patches/hyper`); a `101` is a final
//! response and goes its own way.

use http::Request;

use crate::http::headers::strip_hop_by_hop;

/// Has the upstream connection relay `req`'s interim responses to whoever sent it, if its server
/// connection takes them. Costs a callback registration (one allocation) per request.
pub fn relay<B>(req: &mut Request<B>) {
    let Some(sender) = req.extensions().get::<hyper::ext::InterimSender>().cloned() else { return };
    hyper::ext::on_informational(req, move |res| {
        let mut out = http::Response::new(());
        *out.status_mut() = res.status();
        *out.headers_mut() = res.headers().clone();
        // The upstream connection's own fields stay on it, as on any response.
        strip_hop_by_hop(out.headers_mut(), false);
        // Refused (and dropped) once the final response is out or the client is gone.
        let _ = sender.send(out);
    });
}
