//! The gateway's own fields on an answer (`x-abgate-*`), kept as what they
//! say and written into the head by the side that writes it, rather than
//! each inserted into the answer's header map (a hash and a probe apiece,
//! on every request) only to be read back out of it.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::access::FORCED_HEADER;
use super::{
    EXPERIMENT_HEADER, FALLBACK_HEADER, MODEL_HEADER, REQUEST_ID_HEADER, SERVED_BY_HEADER,
    VARIANT_HEADER,
};
use crate::experiment::assign::Variant;

/// What the gateway tells the client about its request.
#[derive(Debug, Clone, Default)]
pub(crate) struct GatewayFields {
    /// The arm was forced (`x-abgate-forced: true`).
    pub(crate) forced: bool,
    /// The arm assigned, if the request got that far.
    pub(crate) variant: Option<Variant>,
    /// Treatment failed and control answered.
    pub(crate) fallback: bool,
    /// The model sent upstream.
    pub(crate) model: Option<HeaderValue>,
    pub(crate) experiment: Option<HeaderValue>,
    pub(crate) request_id: Option<HeaderValue>,
}

impl GatewayFields {
    /// Each field, in the order they are written.
    fn each(&self, mut field: impl FnMut(&HeaderName, &[u8])) {
        if self.forced {
            field(&FORCED_HEADER, b"true");
        }
        if let Some(variant) = self.variant {
            field(&VARIANT_HEADER, variant.as_str().as_bytes());
        }
        if self.fallback {
            field(&FALLBACK_HEADER, b"true");
            field(&SERVED_BY_HEADER, Variant::Control.as_str().as_bytes());
        }
        for (name, value) in [
            (&MODEL_HEADER, &self.model),
            (&EXPERIMENT_HEADER, &self.experiment),
            (&REQUEST_ID_HEADER, &self.request_id),
        ] {
            if let Some(value) = value {
                field(name, value.as_bytes());
            }
        }
    }

    /// Writes the fields as head lines (each value is a checked
    /// `HeaderValue` or one of the gateway's own words).
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        self.each(|name, value| {
            abgate_http1::framing::write_field(out, name.as_str().as_bytes(), value)
        });
    }

    /// Puts the fields in `headers`, for a side that writes heads from a
    /// map (HTTP/2).
    pub(crate) fn add_to(&self, headers: &mut HeaderMap) {
        self.each(|name, value| {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(name.clone(), value);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_written_in_order_and_the_same_goes_in_a_map() {
        let fields = GatewayFields {
            forced: true,
            variant: Some(Variant::Treatment),
            fallback: true,
            model: Some(HeaderValue::from_static("ft:m")),
            experiment: Some(HeaderValue::from_static("exp")),
            request_id: Some(HeaderValue::from_static("abg2_t_00_11_22_exp")),
        };
        let mut out = Vec::new();
        fields.write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x-abgate-forced: true\r\nx-abgate-variant: treatment\r\n\
             x-abgate-fallback: true\r\nx-abgate-served-by: control\r\n\
             x-abgate-model: ft:m\r\nx-abgate-experiment: exp\r\n\
             x-abgate-request-id: abg2_t_00_11_22_exp\r\n"
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-abgate-variant", HeaderValue::from_static("forged"));
        fields.add_to(&mut headers);
        assert_eq!(headers.len(), 7);
        assert_eq!(headers["x-abgate-variant"], "treatment");

        let mut out = Vec::new();
        GatewayFields::default().write(&mut out);
        assert!(out.is_empty());
    }
}
